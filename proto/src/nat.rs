//! What a leaf knows about its own reachability: its NAT class and its address candidates, as published in its
//! presence and checked by the super peer that stores them.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Most address candidates one peer publishes.
pub const MAX_CANDIDATES: usize = 8;

/// The mapping behaviour of the NAT in front of a leaf, as learned from STUN answers of two super peers at
/// different addresses (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatClass {
    /// Not measured yet, or only one super peer answered (one answer cannot tell mappings apart).
    Unknown,
    /// No STUN answer at all: UDP is blocked or the super peers do not serve STUN; only relaying can work.
    UdpBlocked,
    /// The reflexive address is the socket's own: no NAT in the way.
    Public,
    /// Endpoint-independent mapping: the same public address and port towards every destination. Hole
    /// punching works against it.
    EndpointIndependent,
    /// Endpoint-dependent ("symmetric") mapping: a new public port per destination. Punching needs the other
    /// side to be easy, or port prediction.
    EndpointDependent,
}

impl NatClass {
    /// The text form used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            NatClass::Unknown => "unknown",
            NatClass::UdpBlocked => "udp-blocked",
            NatClass::Public => "public",
            NatClass::EndpointIndependent => "endpoint-independent",
            NatClass::EndpointDependent => "endpoint-dependent",
        }
    }

    /// Classifies from the socket's local address and the reflexive addresses two or more super peers at
    /// different IPs reported for it (in any order; failed queries left out).
    pub fn classify(local: SocketAddr, reflexive: &[SocketAddr]) -> NatClass {
        match reflexive {
            [] => NatClass::UdpBlocked,
            [only] if *only == local => NatClass::Public,
            [_] => NatClass::Unknown,
            [first, rest @ ..] => {
                if rest.iter().any(|other| other != first) {
                    NatClass::EndpointDependent
                } else if *first == local {
                    NatClass::Public
                } else {
                    NatClass::EndpointIndependent
                }
            }
        }
    }
}

impl fmt::Display for NatClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A NAT class text that is not one of the known values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown NAT class {0:?} (expected unknown, udp-blocked, public, endpoint-independent or endpoint-dependent)")]
pub struct UnknownNatClass(pub String);

impl FromStr for NatClass {
    type Err = UnknownNatClass;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "" | "unknown" => NatClass::Unknown,
            "udp-blocked" => NatClass::UdpBlocked,
            "public" => NatClass::Public,
            "endpoint-independent" => NatClass::EndpointIndependent,
            "endpoint-dependent" => NatClass::EndpointDependent,
            other => return Err(UnknownNatClass(other.to_string())),
        })
    }
}

/// Why a candidate list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCandidates {
    #[error("{count} address candidates, at most {MAX_CANDIDATES} are allowed")]
    TooMany { count: usize },
    #[error("address candidate {0:?} is not an IP:port socket address")]
    NotAnAddress(String),
    #[error("address candidate {0} has port 0 or an unspecified or multicast IP")]
    Unusable(SocketAddr),
}

/// Parses and checks published candidates: at most [`MAX_CANDIDATES`], each a usable `IP:port`.
pub fn parse_candidates(candidates: &[String]) -> Result<Vec<SocketAddr>, BadCandidates> {
    if candidates.len() > MAX_CANDIDATES {
        return Err(BadCandidates::TooMany {
            count: candidates.len(),
        });
    }
    candidates
        .iter()
        .map(|text| {
            let addr: SocketAddr = text
                .parse()
                .map_err(|_| BadCandidates::NotAnAddress(text.chars().take(64).collect()))?;
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(BadCandidates::Unusable(addr));
            }
            Ok(addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn classification_follows_the_answers() {
        let local = addr("10.0.0.2:5000");
        assert_eq!(NatClass::classify(local, &[]), NatClass::UdpBlocked);
        assert_eq!(
            NatClass::classify(local, &[addr("203.0.113.5:5000")]),
            NatClass::Unknown
        );
        assert_eq!(NatClass::classify(local, &[local, local]), NatClass::Public);
        let mapped = addr("203.0.113.5:5000");
        assert_eq!(
            NatClass::classify(local, &[mapped, mapped]),
            NatClass::EndpointIndependent
        );
        assert_eq!(
            NatClass::classify(local, &[mapped, addr("203.0.113.5:6001")]),
            NatClass::EndpointDependent
        );
    }

    #[test]
    fn text_forms_round_trip_and_unknown_ones_are_named() {
        for class in [
            NatClass::Unknown,
            NatClass::UdpBlocked,
            NatClass::Public,
            NatClass::EndpointIndependent,
            NatClass::EndpointDependent,
        ] {
            assert_eq!(class.as_str().parse::<NatClass>(), Ok(class));
        }
        assert!("cone"
            .parse::<NatClass>()
            .unwrap_err()
            .to_string()
            .contains("\"cone\""));
    }

    #[test]
    fn candidates_are_checked() {
        assert_eq!(
            parse_candidates(&["192.0.2.1:4000".into()]),
            Ok(vec![addr("192.0.2.1:4000")])
        );
        assert!(matches!(
            parse_candidates(&vec!["192.0.2.1:4000".to_string(); 9]),
            Err(BadCandidates::TooMany { count: 9 })
        ));
        assert!(matches!(
            parse_candidates(&["example.org:80".into()]),
            Err(BadCandidates::NotAnAddress(_))
        ));
        assert!(matches!(
            parse_candidates(&["0.0.0.0:80".into()]),
            Err(BadCandidates::Unusable(_))
        ));
        assert!(matches!(
            parse_candidates(&["192.0.2.1:0".into()]),
            Err(BadCandidates::Unusable(_))
        ));
    }
}
