//! The relay's datagram format and its allocation table (as super peers run it). When two leaves cannot reach
//! each other directly, both send their (already end-to-end encrypted QUIC) datagrams to a super peer's UDP
//! port, which passes each side's datagrams to the other.
//!
//! ```text
//!  broker grants token T (caps: bytes, seconds, bytes/s) ── in both punch plans
//!  side A: [00 'V' 'R' 'B' | T] ──> relay   (bind: A's address joins allocation T)  <── [00 'V' 'R' 'A' | status]
//!  side B: [00 'V' 'R' 'B' | T] ──> relay   (the second address completes it)
//!  afterwards every datagram from A's address goes to B's and back, unchanged, until a cap ends the allocation
//!  cap reached: [00 'V' 'R' 'E' | reason] ──> both sides, and again to every later datagram from either
//!  direct path won instead: [00 'V' 'R' 'X' | T] ──> relay   (release: the unbound allocation is dropped)
//! ```
//!
//! The relay never looks inside the datagrams (they are QUIC, encrypted by the peers' own keys). A token is 16
//! random bytes known only to the broker and the two peers; it binds two addresses at most. The relay shares
//! the STUN port: datagrams from bound addresses are relayed, binds are recognised by their tag, anything else
//! is offered to STUN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rate::TokenBucket;

/// First bytes of a bind request; the leading zero byte keeps it apart from QUIC (whose first byte has the
/// 0x40 bit set) and the tag apart from STUN (whose bytes 4..8 are the magic cookie, checked there).
pub const BIND_TAG: [u8; 4] = [0x00, b'V', b'R', b'B'];
/// First bytes of a bind answer.
pub const BIND_ANSWER_TAG: [u8; 4] = [0x00, b'V', b'R', b'A'];
/// First bytes of an end notice: the allocation ended, the next byte says why ([`EndReason`]).
pub const END_TAG: [u8; 4] = [0x00, b'V', b'R', b'E'];
/// First bytes of a release: `[00 'V' 'R' 'X' | token]`, sent by a leaf whose connection went direct, so the
/// unused allocation stops holding a place. Only an allocation no address has bound is released; no answer.
pub const RELEASE_TAG: [u8; 4] = [0x00, b'V', b'R', b'X'];
/// Length of a bind request: the tag and a 16-byte token.
pub const BIND_LEN: usize = 20;

fn tagged(tag: [u8; 4], token: &[u8; 16]) -> [u8; BIND_LEN] {
    let mut request = [0u8; BIND_LEN];
    request[..4].copy_from_slice(&tag);
    request[4..].copy_from_slice(token);
    request
}

/// A bind request for the allocation of `token`.
pub fn bind_request(token: &[u8; 16]) -> [u8; BIND_LEN] {
    tagged(BIND_TAG, token)
}

/// A release of the allocation of `token`.
pub fn release_request(token: &[u8; 16]) -> [u8; BIND_LEN] {
    tagged(RELEASE_TAG, token)
}

/// The status byte of a bind answer, or None when `datagram` is not one.
pub fn parse_bind_answer(datagram: &[u8]) -> Option<u8> {
    match datagram {
        [a, b, c, d, status] if [*a, *b, *c, *d] == BIND_ANSWER_TAG => Some(*status),
        _ => None,
    }
}

/// The reason byte of an end notice, or None when `datagram` is not one.
pub fn parse_end_notice(datagram: &[u8]) -> Option<u8> {
    match datagram {
        [a, b, c, d, reason] if [*a, *b, *c, *d] == END_TAG => Some(*reason),
        _ => None,
    }
}
/// An unbound or half-bound allocation is dropped after this long.
const BIND_WINDOW: Duration = Duration::from_secs(30);
/// A bound allocation with no datagram for this long is over (its peers closed the connection; QUIC keeps a
/// live one busy with keep-alives every few seconds), and no longer counts as load.
const IDLE_END: Duration = Duration::from_secs(30);
/// An ended allocation is remembered this long, so that late datagrams of its sides still hear why.
const ENDED_LINGER: Duration = Duration::from_secs(60);

/// Why an allocation ended (the byte after [`END_TAG`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// Its byte cap was reached.
    Bytes = 1,
    /// Its time cap was reached.
    Time = 2,
}

impl EndReason {
    pub fn from_byte(byte: u8) -> Option<EndReason> {
        Some(match byte {
            1 => EndReason::Bytes,
            2 => EndReason::Time,
            _ => return None,
        })
    }

    pub fn notice(self) -> [u8; 5] {
        let mut notice = [0u8; 5];
        notice[..4].copy_from_slice(&END_TAG);
        notice[4] = self as u8;
        notice
    }
}

/// Status byte of a bind answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BindStatus {
    /// Bound; waiting for the other side or already complete.
    Bound = 0,
    /// No allocation has this token (never granted, forged, or expired and forgotten).
    UnknownToken = 1,
    /// Two other addresses already hold this token.
    Taken = 2,
    /// The allocation ended because a cap was reached.
    Ended = 3,
}

impl BindStatus {
    pub fn from_byte(byte: u8) -> Option<BindStatus> {
        Some(match byte {
            0 => BindStatus::Bound,
            1 => BindStatus::UnknownToken,
            2 => BindStatus::Taken,
            3 => BindStatus::Ended,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            BindStatus::Bound => "bound",
            BindStatus::UnknownToken => "unknown or expired relay token",
            BindStatus::Taken => "relay token already used by two other addresses",
            BindStatus::Ended => "relay allocation ended (a cap was reached)",
        }
    }
}

/// Relay caps; see docs/LIMITS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Offer relaying at all. Default true.
    pub enabled: bool,
    /// Bytes one allocation may carry, both directions together. Default 256 MiB.
    pub max_bytes: u64,
    /// How long an allocation lives, in whole seconds (grants carry seconds). Default 10 minutes.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// Bytes per second in each direction; more is dropped. Default 8 MiB/s.
    pub max_bytes_per_second: u64,
    /// Allocations at once on this node. Default 1000.
    pub max_allocations: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            max_lifetime: Duration::from_secs(600),
            max_bytes_per_second: 8 * 1024 * 1024,
            max_allocations: 1000,
        }
    }
}

impl RelayConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_bytes == 0 || self.max_bytes_per_second == 0 {
            problems.push("relay.max_bytes and relay.max_bytes_per_second must be above 0".into());
        }
        if self.max_lifetime < Duration::from_secs(1)
            || self.max_lifetime > Duration::from_secs(u64::from(u32::MAX))
        {
            problems.push(format!(
                "relay.max_lifetime must be between 1s and {}s, not {:?}",
                u32::MAX,
                self.max_lifetime
            ));
        }
        if self.max_allocations == 0 {
            problems.push("relay.max_allocations must be above 0".into());
        }
        problems
    }
}

/// A granted allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub token: [u8; 16],
    pub max_bytes: u64,
    pub max_seconds: u32,
    pub max_bytes_per_second: u64,
}

struct Allocation {
    sides: [Option<SocketAddr>; 2],
    granted_at: Instant,
    expires_at: Instant,
    bytes: u64,
    max_bytes: u64,
    rate: u64,
    buckets: [TokenBucket; 2],
    ended: Option<(EndReason, Instant)>,
    last_datagram: Instant,
}

impl Allocation {
    /// Whether it still counts: not ended by a cap, within its time, and not idle once bound.
    fn live(&self, now: Instant) -> bool {
        let idle =
            self.sides[1].is_some() && now.saturating_duration_since(self.last_datagram) > IDLE_END;
        self.ended.is_none() && now < self.expires_at && !idle
    }
}

/// What to do with a datagram that reached the relay/STUN port.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send it on to this address.
    Forward(SocketAddr),
    /// Answer the sender with these bytes (a bind answer, or an end notice).
    Answer([u8; 5]),
    /// The allocation just ended: send this notice to both sides.
    End([u8; 5], [SocketAddr; 2]),
    /// Drop it (over a cap, or the other side is not bound yet).
    Drop,
    /// Not relay traffic: offer it to STUN.
    NotRelay,
}

/// The allocations of this node.
pub struct RelayTable {
    config: RelayConfig,
    allocations: HashMap<[u8; 16], Allocation>,
    by_addr: HashMap<SocketAddr, [u8; 16]>,
}

impl RelayTable {
    pub fn new(config: RelayConfig) -> Self {
        Self {
            config,
            allocations: HashMap::new(),
            by_addr: HashMap::new(),
        }
    }

    /// Grants a new allocation, or `None` when the node is at its allocation limit or relaying is off.
    pub fn grant(&mut self, now: Instant) -> Option<Grant> {
        self.expire(now);
        if !self.config.enabled || self.active(now) >= self.config.max_allocations {
            return None;
        }
        let token: [u8; 16] = rand::random();
        let rate = self.config.max_bytes_per_second;
        let burst = u32::try_from(rate).unwrap_or(u32::MAX);
        // Whole seconds, as the grant tells the leaf (a fraction of a second is dropped).
        let seconds = u32::try_from(self.config.max_lifetime.as_secs()).unwrap_or(u32::MAX);
        self.allocations.insert(
            token,
            Allocation {
                sides: [None, None],
                granted_at: now,
                expires_at: now + Duration::from_secs(u64::from(seconds)),
                bytes: 0,
                max_bytes: self.config.max_bytes,
                rate,
                buckets: [TokenBucket::new(burst, now), TokenBucket::new(burst, now)],
                ended: None,
                last_datagram: now,
            },
        );
        Some(Grant {
            token,
            max_bytes: self.config.max_bytes,
            max_seconds: seconds,
            max_bytes_per_second: rate,
        })
    }

    /// Allocations held, ended ones included until they are forgotten.
    pub fn len(&self) -> usize {
        self.allocations.len()
    }

    /// Allocations not yet ended (what the allocation limit and load reports count).
    pub fn active(&self, now: Instant) -> usize {
        self.allocations
            .values()
            .filter(|allocation| allocation.live(now))
            .count()
    }

    /// How many allocations this node takes at once (0 when it does not relay).
    pub fn capacity(&self) -> usize {
        if self.config.enabled {
            self.config.max_allocations
        } else {
            0
        }
    }

    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty()
    }

    /// Drops unbound allocations past the bind window, and ended ones (also by time) after a while.
    pub fn expire(&mut self, now: Instant) {
        let by_addr = &mut self.by_addr;
        self.allocations.retain(|_, allocation| {
            let unbound_too_long = allocation.sides[1].is_none()
                && now.saturating_duration_since(allocation.granted_at) > BIND_WINDOW;
            let ended_at = match allocation.ended {
                Some((_, at)) => at,
                None if allocation.sides[1].is_some() => allocation
                    .expires_at
                    .min(allocation.last_datagram + IDLE_END),
                None => allocation.expires_at,
            };
            let keep = now < ended_at + ENDED_LINGER && !unbound_too_long;
            if !keep {
                for side in allocation.sides.iter().flatten() {
                    by_addr.remove(side);
                }
            }
            keep
        });
    }

    /// Decides what happens to `datagram` from `source`.
    pub fn handle(&mut self, datagram: &[u8], source: SocketAddr, now: Instant) -> Action {
        if let Some(token) = self.by_addr.get(&source).copied() {
            if datagram.len() == BIND_LEN && datagram[..4] == BIND_TAG {
                // A repeated bind (the first answer was lost): answer again.
                return self.bind(datagram, source, now);
            }
            let Some(allocation) = self.allocations.get_mut(&token) else {
                self.by_addr.remove(&source);
                return Action::Drop;
            };
            if let Some((reason, _)) = allocation.ended {
                // Smaller than any QUIC datagram: no amplification.
                return Action::Answer(reason.notice());
            }
            let side = usize::from(allocation.sides[1] == Some(source));
            let Some(other) = allocation.sides[1 - side] else {
                return Action::Drop;
            };
            let reason = if now >= allocation.expires_at {
                Some(EndReason::Time)
            } else if allocation.bytes + datagram.len() as u64 > allocation.max_bytes {
                Some(EndReason::Bytes)
            } else {
                None
            };
            if let Some(reason) = reason {
                allocation.ended = Some((reason, now));
                return Action::End(reason.notice(), [source, other]);
            }
            allocation.bytes += datagram.len() as u64;
            allocation.last_datagram = now;
            let burst = u32::try_from(allocation.rate).unwrap_or(u32::MAX);
            let rate = u32::try_from(allocation.rate).unwrap_or(u32::MAX);
            // The bucket counts bytes: one token per byte.
            if !allocation.buckets[side].take_n(rate, burst, datagram.len() as f64, now) {
                return Action::Drop;
            }
            return Action::Forward(other);
        }
        if datagram.len() == BIND_LEN && datagram[..4] == BIND_TAG {
            return self.bind(datagram, source, now);
        }
        if datagram.len() == BIND_LEN && datagram[..4] == RELEASE_TAG {
            let token: [u8; 16] = datagram[4..BIND_LEN].try_into().expect("16 bytes");
            if self
                .allocations
                .get(&token)
                .is_some_and(|allocation| allocation.sides == [None, None])
            {
                self.allocations.remove(&token);
            }
            return Action::Drop;
        }
        Action::NotRelay
    }

    fn bind(&mut self, datagram: &[u8], source: SocketAddr, now: Instant) -> Action {
        self.expire(now);
        let mut token = [0u8; 16];
        token.copy_from_slice(&datagram[4..BIND_LEN]);
        let status = match self.allocations.get_mut(&token) {
            None => BindStatus::UnknownToken,
            Some(allocation) if allocation.ended.is_some() || now >= allocation.expires_at => {
                BindStatus::Ended
            }
            Some(allocation) => {
                if allocation.sides.contains(&Some(source)) {
                    BindStatus::Bound
                } else if let Some(free) = allocation.sides.iter_mut().find(|side| side.is_none()) {
                    *free = Some(source);
                    self.by_addr.insert(source, token);
                    BindStatus::Bound
                } else {
                    BindStatus::Taken
                }
            }
        };
        let mut answer = [0u8; 5];
        answer[..4].copy_from_slice(&BIND_ANSWER_TAG);
        answer[4] = status as u8;
        Action::Answer(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// A table with one allocation that two addresses have bound.
    fn bound(config: RelayConfig) -> (RelayTable, Instant, SocketAddr, SocketAddr, Grant) {
        let mut table = RelayTable::new(config);
        let now = Instant::now();
        let grant = table.grant(now).unwrap();
        let (a, b) = (addr("192.0.2.1:1000"), addr("192.0.2.2:2000"));
        table.handle(&bind_request(&grant.token), a, now);
        table.handle(&bind_request(&grant.token), b, now);
        (table, now, a, b, grant)
    }

    #[test]
    fn two_sides_bind_and_datagrams_cross() {
        let mut table = RelayTable::new(RelayConfig::default());
        let now = Instant::now();
        let grant = table.grant(now).unwrap();
        let (a, b, c) = (
            addr("192.0.2.1:1000"),
            addr("192.0.2.2:2000"),
            addr("192.0.2.3:3000"),
        );
        assert_eq!(
            table.handle(&bind_request(&grant.token), a, now),
            Action::Answer([0, b'V', b'R', b'A', BindStatus::Bound as u8])
        );
        // Before the other side binds, traffic is dropped.
        assert_eq!(table.handle(b"\xC0quic", a, now), Action::Drop);
        table.handle(&bind_request(&grant.token), b, now);
        assert_eq!(table.handle(b"\xC0quic", a, now), Action::Forward(b));
        assert_eq!(table.handle(b"\x40quic", b, now), Action::Forward(a));
        // A third address cannot join.
        assert_eq!(
            table.handle(&bind_request(&grant.token), c, now),
            Action::Answer([0, b'V', b'R', b'A', BindStatus::Taken as u8])
        );
        assert_eq!(table.handle(b"\xC0quic", c, now), Action::NotRelay);
    }

    #[test]
    fn forged_and_expired_tokens_are_refused() {
        let config = RelayConfig {
            max_lifetime: Duration::from_secs(1),
            ..RelayConfig::default()
        };
        let mut table = RelayTable::new(config);
        let now = Instant::now();
        let forged = [7u8; 16];
        assert_eq!(
            table.handle(&bind_request(&forged), addr("192.0.2.1:1"), now),
            Action::Answer([0, b'V', b'R', b'A', BindStatus::UnknownToken as u8])
        );
        let grant = table.grant(now).unwrap();
        let later = now + Duration::from_secs(2);
        assert_eq!(
            table.handle(&bind_request(&grant.token), addr("192.0.2.1:1"), later),
            Action::Answer([0, b'V', b'R', b'A', BindStatus::Ended as u8]),
            "past its time, not yet forgotten"
        );
        let much_later = later + ENDED_LINGER;
        assert_eq!(
            table.handle(&bind_request(&grant.token), addr("192.0.2.1:1"), much_later),
            Action::Answer([0, b'V', b'R', b'A', BindStatus::UnknownToken as u8])
        );
        assert!(table.is_empty());
    }

    #[test]
    fn the_time_cap_ends_the_allocation_with_a_notice() {
        let config = RelayConfig {
            max_lifetime: Duration::from_secs(1),
            ..RelayConfig::default()
        };
        let (mut table, now, a, b, _) = bound(config);
        assert_eq!(table.handle(b"\xC0quic", a, now), Action::Forward(b));
        let later = now + Duration::from_secs(1);
        let notice = [0, b'V', b'R', b'E', EndReason::Time as u8];
        assert_eq!(
            table.handle(b"\xC0quic", b, later),
            Action::End(notice, [b, a])
        );
        assert_eq!(table.handle(b"\xC0quic", a, later), Action::Answer(notice));
    }

    #[test]
    fn the_byte_cap_ends_the_allocation() {
        let config = RelayConfig {
            max_bytes: 3000,
            ..RelayConfig::default()
        };
        let (mut table, now, a, b, grant) = bound(config);
        let packet = vec![0xC0u8; 1200];
        assert_eq!(table.handle(&packet, a, now), Action::Forward(b));
        assert_eq!(table.handle(&packet, b, now), Action::Forward(a));
        let notice = [0, b'V', b'R', b'E', EndReason::Bytes as u8];
        assert_eq!(
            table.handle(&packet, a, now),
            Action::End(notice, [a, b]),
            "3600 bytes > 3000: the datagram is not forwarded, both sides hear why"
        );
        assert_eq!(
            table.handle(&packet, b, now),
            Action::Answer(notice),
            "ended for both"
        );
        assert_eq!(
            table.handle(&bind_request(&grant.token), addr("192.0.2.9:9"), now),
            Action::Answer([0, b'V', b'R', b'A', BindStatus::Ended as u8])
        );
    }

    #[test]
    fn an_idle_allocation_stops_counting_and_is_forgotten() {
        let (mut table, now, a, b, _) = bound(RelayConfig::default());
        assert_eq!(table.handle(b"\xC0quic", a, now), Action::Forward(b));
        assert_eq!(table.active(now), 1);
        let idle = now + IDLE_END + Duration::from_secs(1);
        assert_eq!(table.active(idle), 0);
        table.expire(idle + ENDED_LINGER);
        assert!(table.is_empty());
    }

    #[test]
    fn an_unused_allocation_is_released_but_a_bound_one_is_not() {
        let mut table = RelayTable::new(RelayConfig::default());
        let now = Instant::now();
        let unused = table.grant(now).unwrap();
        let used = table.grant(now).unwrap();
        table.handle(&bind_request(&used.token), addr("192.0.2.1:1"), now);
        assert_eq!(
            table.handle(&release_request(&unused.token), addr("192.0.2.5:5"), now),
            Action::Drop
        );
        assert_eq!(
            table.handle(&release_request(&used.token), addr("192.0.2.5:5"), now),
            Action::Drop
        );
        assert_eq!(table.active(now), 1, "only the bound allocation is left");
    }

    #[test]
    fn the_allocation_limit_is_kept() {
        let config = RelayConfig {
            max_allocations: 2,
            ..RelayConfig::default()
        };
        let mut table = RelayTable::new(config);
        let now = Instant::now();
        assert!(table.grant(now).is_some());
        assert!(table.grant(now).is_some());
        assert!(table.grant(now).is_none());
    }
}
