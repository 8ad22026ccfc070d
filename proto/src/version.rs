//! Protocol versions: which versions of the Vesper protocol a build speaks, and how two sides agree on one.
//!
//! A build speaks every version from [`OLDEST`] to [`NEWEST`]. Two sides agree on the highest version both speak;
//! when their ranges do not overlap the connection is refused with a message that names both ranges, so an
//! operator sees at once which side to upgrade.
//!
//! The policy (docs/DECISIONS.md, "Protocol versions"): from the first release on, each release speaks its own
//! version and the one before it (`OLDEST = NEWEST - 1`), so a rolling upgrade, one node at a time, never stops a
//! cluster, and leaves may lag their super peers by one release.
//!
//! Where the version travels:
//! - a leaf's session: `Attach.protocol_oldest` / `Attach.protocol_newest`, answered by
//!   `Welcome.protocol_version`, the version the super peer chose for the session;
//! - between super peers: the [`CLUSTER_METADATA_KEY`] header on every Cluster call, holding the caller's range
//!   as `"oldest-newest"`; the receiving member refuses a call whose range does not meet its own.

use std::fmt;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The newest protocol version this build speaks. 2: a peer's presence lists several sessions, with replicated
/// rules that version 1 members apply differently (docs/DECISIONS.md, "Several sessions per peer").
pub const NEWEST: u32 = 2;
/// The oldest protocol version this build still speaks. Nothing is released yet, so version 1 is not kept: a
/// version-1 member in a version-2 cluster would apply presence changes by other rules.
pub const OLDEST: u32 = 2;

/// Request metadata key carrying the calling super peer's protocol range on Cluster calls.
pub const CLUSTER_METADATA_KEY: &str = "x-vesper-protocol";

/// A contiguous range of protocol versions, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Oldest version in the range.
    pub oldest: u32,
    /// Newest version in the range.
    pub newest: u32,
}

/// The versions this build speaks.
pub const OURS: Range = Range {
    oldest: OLDEST,
    newest: NEWEST,
};

/// Why two sides could not agree on a protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The other side named no version (a client from before versions, or one that does not set the field).
    #[error("the peer names no protocol version ({what}); this side speaks protocol {ours}")]
    Missing {
        /// Which field or header was missing.
        what: &'static str,
        /// What this side speaks.
        ours: Range,
    },
    /// The other side's range is not a range (`oldest` above `newest`, or not `"oldest-newest"` text).
    #[error(
        "malformed protocol version {text:?}: expected two versions, oldest first, like \"1-2\""
    )]
    Malformed {
        /// What was received.
        text: String,
    },
    /// The ranges do not meet.
    #[error(
        "protocol versions do not meet: the peer speaks {theirs}, this side speaks {ours}; {older} is older, upgrade it"
    )]
    Disjoint {
        /// The other side's range.
        theirs: Range,
        /// This side's range.
        ours: Range,
        /// Which side is older: "the peer" or "this side".
        older: &'static str,
    },
}

impl Range {
    /// A range from its two ends as a peer sent them; `what` names the field for the error.
    pub fn from_wire(oldest: u32, newest: u32, what: &'static str) -> Result<Self, VersionError> {
        if newest == 0 {
            return Err(VersionError::Missing { what, ours: OURS });
        }
        // An old client that sets only the newest version speaks just that one.
        let oldest = if oldest == 0 { newest } else { oldest };
        if oldest > newest {
            return Err(VersionError::Malformed {
                text: format!("{oldest}-{newest}"),
            });
        }
        Ok(Self { oldest, newest })
    }

    /// Parses the `"oldest-newest"` text of the Cluster header (a single number means a range of one).
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let malformed = || VersionError::Malformed {
            text: text.chars().take(32).collect(),
        };
        let (oldest, newest) = match text.split_once('-') {
            Some((oldest, newest)) => (oldest, newest),
            None => (text, text),
        };
        let oldest: u32 = oldest.trim().parse().map_err(|_| malformed())?;
        let newest: u32 = newest.trim().parse().map_err(|_| malformed())?;
        if oldest == 0 || oldest > newest {
            return Err(malformed());
        }
        Ok(Self { oldest, newest })
    }

    /// The highest version both ranges hold.
    pub fn agree(self, ours: Range) -> Result<u32, VersionError> {
        let chosen = self.newest.min(ours.newest);
        if chosen < self.oldest.max(ours.oldest) {
            return Err(VersionError::Disjoint {
                theirs: self,
                ours,
                older: if self.newest < ours.oldest {
                    "the peer"
                } else {
                    "this side"
                },
            });
        }
        Ok(chosen)
    }

    /// Whether `version` lies in the range.
    pub fn holds(self, version: u32) -> bool {
        (self.oldest..=self.newest).contains(&version)
    }
}

/// Stamps every Cluster call with this build's protocol range ([`CLUSTER_METADATA_KEY`]); a member refuses
/// calls without it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterStamp;

/// A channel whose calls carry the [`ClusterStamp`]: what Cluster clients are built on.
pub type StampedChannel = InterceptedService<Channel, ClusterStamp>;

impl tonic::service::Interceptor for ClusterStamp {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = MetadataValue::try_from(format!("{}-{}", OURS.oldest, OURS.newest))
            .expect("digits and a dash are valid metadata");
        request.metadata_mut().insert(CLUSTER_METADATA_KEY, value);
        Ok(request)
    }
}

/// What a member accepts of a Cluster call's stamp: the caller's range must meet ours. Returns the version the
/// two agree on.
pub fn check_cluster_stamp(metadata: &tonic::metadata::MetadataMap) -> Result<u32, VersionError> {
    let Some(value) = metadata.get(CLUSTER_METADATA_KEY) else {
        return Err(VersionError::Missing {
            what: "the x-vesper-protocol header of a Cluster call",
            ours: OURS,
        });
    };
    let text = value.to_str().map_err(|_| VersionError::Malformed {
        text: String::from_utf8_lossy(value.as_bytes())
            .chars()
            .take(32)
            .collect(),
    })?;
    Range::parse(text)?.agree(OURS)
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oldest == self.newest {
            write!(f, "{}", self.newest)
        } else {
            write!(f, "{}-{}", self.oldest, self.newest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(oldest: u32, newest: u32) -> Range {
        Range { oldest, newest }
    }

    #[test]
    fn the_highest_common_version_is_chosen() {
        // (theirs, ours, expected)
        let cases = [
            (range(1, 1), range(1, 1), Ok(1)),
            (range(1, 2), range(1, 1), Ok(1)),
            (range(1, 1), range(1, 2), Ok(1)),
            (range(2, 3), range(1, 2), Ok(2)),
            (range(1, 2), range(2, 3), Ok(2)),
            (range(3, 5), range(1, 9), Ok(5)),
            (range(1, 1), range(2, 3), Err("the peer")),
            (range(4, 5), range(2, 3), Err("this side")),
        ];
        for (theirs, ours, expected) in cases {
            let got = theirs.agree(ours).map_err(|error| match error {
                VersionError::Disjoint { older, .. } => older,
                other => panic!("unexpected {other}"),
            });
            assert_eq!(got, expected, "theirs {theirs}, ours {ours}");
        }
    }

    #[test]
    fn agreement_is_symmetric_and_inside_both_ranges() {
        for a in 1..6 {
            for b in a..6 {
                for c in 1..6 {
                    for d in c..6 {
                        let (x, y) = (range(a, b), range(c, d));
                        let one = x.agree(y).ok();
                        assert_eq!(one, y.agree(x).ok(), "{x} vs {y}");
                        if let Some(version) = one {
                            assert!(x.holds(version) && y.holds(version));
                            assert!((version + 1..=6).all(|v| !(x.holds(v) && y.holds(v))));
                        } else {
                            assert!((1..=6).all(|v| !(x.holds(v) && y.holds(v))));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn wire_values_are_checked() {
        assert!(matches!(
            Range::from_wire(0, 0, "Attach.protocol_newest"),
            Err(VersionError::Missing { .. })
        ));
        assert_eq!(Range::from_wire(0, 3, "x"), Ok(range(3, 3)));
        assert_eq!(Range::from_wire(2, 3, "x"), Ok(range(2, 3)));
        assert!(matches!(
            Range::from_wire(4, 3, "x"),
            Err(VersionError::Malformed { .. })
        ));
        assert_eq!(Range::parse("1-2"), Ok(range(1, 2)));
        assert_eq!(Range::parse("7"), Ok(range(7, 7)));
        for bad in ["", "-", "0-1", "2-1", "a-b", "1-", "1--2", "99999999999"] {
            assert!(
                matches!(Range::parse(bad), Err(VersionError::Malformed { .. })),
                "{bad:?}"
            );
        }
        let stamped =
            tonic::service::Interceptor::call(&mut ClusterStamp, tonic::Request::new(())).unwrap();
        assert_eq!(check_cluster_stamp(stamped.metadata()), Ok(NEWEST));
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert!(matches!(
            check_cluster_stamp(&metadata),
            Err(VersionError::Missing { .. })
        ));
        metadata.insert(CLUSTER_METADATA_KEY, MetadataValue::from_static("90-99"));
        let refused = check_cluster_stamp(&metadata).unwrap_err();
        assert!(
            refused.to_string().contains("the peer speaks 90-99")
                && refused.to_string().contains("this side is older"),
            "{refused}"
        );
        let error = Range::from_wire(0, 0, "Attach.protocol_newest").unwrap_err();
        assert!(
            error.to_string().contains("Attach.protocol_newest"),
            "{error}"
        );
    }
}
