//! The STUN port of a super peer: RFC 8489 Binding on UDP, on the leaf IP and the same port number as the Leaf
//! service (TCP), so a leaf finds it from the address it already knows.
//!
//! UDP sources can be forged, so the port must never be a useful reflector: what to answer is decided in
//! [`vesper_proto::stun::answer`] (only Binding requests, nothing for garbage), and here every answer must also
//! pass three limits: its datagram is at most `max_amplification_percent` percent of the request's (IP and UDP headers
//! counted), its source's token bucket has a token, and the node-wide answer rate is not exceeded. Anything
//! over a limit is dropped without a word: a victim of spoofing gets at most the per-source rate of packets no
//! larger than the attacker's own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Action as RelayAction, RelayTable};
use crate::limits::{SourceBuckets, TokenBucket};
use crate::metrics::StunDrop;

/// Slots in the per-source table (each a few bytes); see [`SourceBuckets`].
const SOURCE_SLOTS: usize = 4096;

/// Limits of the STUN port; see docs/LIMITS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StunConfig {
    /// Serve STUN at all. Default true.
    pub enabled: bool,
    /// Answers per second to one source IP, sustained. Default 20.
    pub rate_per_source: u32,
    /// Answers to one source IP in a burst. Default 40.
    pub burst_per_source: u32,
    /// Answers per second from this node in all. Default 20000.
    pub max_answers_per_second: u32,
    /// An answer's IP datagram is at most this percentage of the request's size. Default 150: the 20-byte
    /// Binding request of a plain RFC 8489 client (48 bytes on the wire) gets its 32-byte answer (60 bytes).
    pub max_amplification_percent: u32,
}

impl Default for StunConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rate_per_source: 20,
            burst_per_source: 40,
            max_answers_per_second: 20_000,
            max_amplification_percent: 150,
        }
    }
}

impl StunConfig {
    /// Problems with these settings, for `Config::validate`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.rate_per_source == 0 || self.burst_per_source == 0 {
            problems.push("stun.rate_per_source and stun.burst_per_source must be above 0".into());
        }
        if self.max_answers_per_second == 0 {
            problems.push("stun.max_answers_per_second must be above 0".into());
        }
        if !(100..=1000).contains(&self.max_amplification_percent) {
            problems.push(format!(
                "stun.max_amplification_percent must be between 100 and 1000, not {}",
                self.max_amplification_percent
            ));
        }
        problems
    }
}

/// Bytes of IP and UDP header around a datagram to or from `addr`.
fn header_bytes(addr: SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 20 + 8,
        SocketAddr::V6(_) => 40 + 8,
    }
}

/// The limits applied to answers, with their state.
struct Limiter {
    config: StunConfig,
    sources: SourceBuckets,
    global: TokenBucket,
}

/// Why an answer was not sent.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Amplification,
    SourceRate,
    NodeRate,
}

impl Limiter {
    fn new(config: StunConfig) -> Self {
        Self {
            config,
            sources: SourceBuckets::new(
                SOURCE_SLOTS,
                config.rate_per_source,
                config.burst_per_source,
            ),
            global: TokenBucket::new(config.max_answers_per_second, Instant::now()),
        }
    }

    fn check(
        &mut self,
        request_len: usize,
        answer_len: usize,
        source: SocketAddr,
        now: Instant,
    ) -> Result<(), Refused> {
        let overhead = header_bytes(source);
        let allowed = (request_len + overhead) * self.config.max_amplification_percent as usize;
        if (answer_len + overhead) * 100 > allowed {
            return Err(Refused::Amplification);
        }
        if !self.sources.take(source.ip(), now) {
            return Err(Refused::SourceRate);
        }
        let rate = self.config.max_answers_per_second;
        if !self.global.take(rate, rate, now) {
            return Err(Refused::NodeRate);
        }
        Ok(())
    }
}

/// Receive and send buffer asked for on the UDP port. The kernel caps it at `net.core.rmem_max`/`wmem_max`
/// (Linux's default 208 KiB drops relayed bursts: a window of 256 QUIC datagrams is 300 KiB).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// How often the port's thread looks at the shutdown token while no datagram arrives.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// A send that finds the socket's buffer full waits at most this long, then the datagram is dropped (under a
/// flood, dropping is the right answer; the receive loop must not stall).
const SEND_WAIT: Duration = Duration::from_millis(2);

/// Binds the UDP port (STUN and relay) with [`SOCKET_BUFFER_BYTES`] of buffer each way.
pub fn bind(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer still works, only with more loss under bursts.
    if let Err(error) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(%error, "udp receive buffer left at the system default");
    }
    if let Err(error) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(%error, "udp send buffer left at the system default");
    }
    socket.bind(&address.into())?;
    socket.set_read_timeout(Some(SHUTDOWN_POLL))?;
    socket.set_write_timeout(Some(SEND_WAIT))?;
    Ok(socket.into())
}

/// Serves Binding requests and relay traffic on `socket` (from [`bind`]) on a thread of its own until
/// `shutdown`; the returned future ends when the thread has.
///
/// A thread, not a task: a relayed datagram is then one wake-up of one thread from receive to forward, where a
/// task on tokio's multi-threaded scheduler was handed between workers (measured: added latency per relayed
/// datagram 34-38 µs as a task vs about 9 µs for coturn; see docs/BENCHMARKS.md).
pub fn spawn(
    socket: std::net::UdpSocket,
    config: StunConfig,
    relay: Arc<std::sync::Mutex<RelayTable>>,
    metrics: crate::metrics::UdpMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("vesper-udp".into())
        .spawn(move || {
            serve(&socket, config, &relay, &metrics, &shutdown);
            drop(done_tx);
        })?;
    Ok(async move {
        let _ = done_rx.await;
    })
}

/// The loop of the UDP port's thread.
fn serve(
    socket: &std::net::UdpSocket,
    config: StunConfig,
    relay: &std::sync::Mutex<RelayTable>,
    metrics: &crate::metrics::UdpMetrics,
    shutdown: &CancellationToken,
) {
    let mut limiter = Limiter::new(config);
    let mut buffer = vec![0u8; 2048];
    let (mut answered, mut dropped) = (0u64, 0u64);
    while !shutdown.is_cancelled() {
        let (len, source) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(error) => {
                // ICMP errors from earlier sends surface here on some systems; the port keeps serving.
                tracing::debug!(%error, "udp port receive error");
                continue;
            }
        };
        let request = &buffer[..len];
        let now = Instant::now();
        let action = relay
            .lock()
            .expect("relay lock")
            .handle(request, source, now);
        match action {
            RelayAction::Forward(to) => {
                let _ = socket.send_to(request, to);
                metrics.relayed(len);
                continue;
            }
            RelayAction::Answer(answer) => {
                if limiter.sources.take(source.ip(), now) {
                    let _ = socket.send_to(&answer, source);
                }
                continue;
            }
            RelayAction::End(notice, sides) => {
                metrics.relay_cap_hit();
                for side in sides {
                    let _ = socket.send_to(&notice, side);
                }
                continue;
            }
            RelayAction::Drop => {
                metrics.relay_dropped();
                continue;
            }
            RelayAction::NotRelay => {}
        }
        let reply = match vesper_proto::stun::answer(request, source) {
            Ok(reply) => reply,
            Err(reason) => {
                tracing::trace!(%source, %reason, "stun datagram ignored");
                metrics.stun_dropped(StunDrop::Malformed);
                dropped += 1;
                continue;
            }
        };
        if let Err(refused) = limiter.check(len, reply.len(), source, now) {
            tracing::trace!(%source, ?refused, "stun answer refused by a limit");
            metrics.stun_dropped(match refused {
                Refused::Amplification => StunDrop::Amplification,
                Refused::SourceRate => StunDrop::SourceRate,
                Refused::NodeRate => StunDrop::NodeRate,
            });
            dropped += 1;
            continue;
        }
        match socket.send_to(&reply, source) {
            Ok(_) => {
                metrics.stun_answered();
                answered += 1;
            }
            Err(_) => {
                metrics.stun_dropped(StunDrop::SendFailed);
                dropped += 1;
            }
        }
    }
    tracing::debug!(answered, dropped, "udp port closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_amplification_limit_counts_headers() {
        let mut limiter = Limiter::new(StunConfig::default());
        let now = Instant::now();
        let v4: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        // 20-byte request, 32-byte answer: (32+28) / (20+28) = 1.25.
        assert_eq!(limiter.check(20, 32, v4, now), Ok(()));
        // 20-byte request, 60-byte answer: 88 / 48 > 1.5.
        assert_eq!(limiter.check(20, 60, v4, now), Err(Refused::Amplification));
        let v6: SocketAddr = "[2001:db8::1]:1000".parse().unwrap();
        // 20-byte request, 44-byte answer over IPv6: 92 / 68 = 1.35.
        assert_eq!(limiter.check(20, 44, v6, now), Ok(()));
    }

    #[test]
    fn the_node_rate_caps_answers_to_many_sources() {
        let config = StunConfig {
            max_answers_per_second: 50,
            ..StunConfig::default()
        };
        let mut limiter = Limiter::new(config);
        let now = Instant::now();
        let answered = (0..1000u32)
            .filter(|i| {
                let source = SocketAddr::from(([10, (i >> 8) as u8, *i as u8, 1], 5000));
                limiter.check(20, 32, source, now).is_ok()
            })
            .count();
        assert_eq!(answered, 50);
    }

    #[test]
    fn bad_settings_are_named() {
        let config = StunConfig {
            max_amplification_percent: 50,
            rate_per_source: 0,
            ..StunConfig::default()
        };
        let problems = config.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[1].contains("max_amplification"));
    }
}
