//! Limits on what a record may hold, checked by the super peer before anything is proposed to Raft (and by the
//! leaf library before anything is sent). Every limit is listed in `docs/LIMITS.md`: the shapes of names and keys
//! are fixed constants, the sizes of values, attributes and messages are [`SizeLimits`] a super peer's operator
//! sets (up to a protocol ceiling).

use std::collections::HashMap;

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest record key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Longest attribute name, in bytes.
pub const MAX_ATTRIBUTE_NAME_LEN: usize = 64;
/// Most terms in one search.
pub const MAX_SEARCH_TERMS: usize = 8;
/// Most records one list or search page returns.
pub const MAX_PAGE_LIMIT: u32 = 1000;
/// Records per page when the request says 0.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;
/// A list or search page (of records or of peers) stops growing once it holds this many bytes of records, even
/// below its count limit; it always holds at least one. This bounds every answer whatever the size limits are.
pub const MAX_PAGE_BYTES: usize = 4 << 20;
/// Largest answer a leaf accepts from a super peer: a full page plus one record at the ceilings, with room for
/// framing. Super peers never send more (see [`MAX_PAGE_BYTES`]).
pub const MAX_ANSWER_BYTES: usize = 2 * MAX_PAGE_BYTES;

/// Pipelined sends one session may have in flight at a super peer; more are refused with RESOURCE_EXHAUSTED.
/// The leaf library holds its own sends to this many, so an app's extra sends wait instead of failing. Wide
/// enough that batches fill up under load: batches form only from waiting sends, and of 256, 1024 and 2048 in
/// one run, 1024 carried the most messages per second (docs/BENCHMARKS.md).
pub const MAX_SENDS_IN_FLIGHT: usize = 1024;
/// Bytes of payload one session's sends in flight may hold at a super peer, so that many large messages cannot
/// pile up there: 64 sends at the default 64 KiB, 4 at the 1 MiB ceiling. Refused and held back as
/// [`MAX_SENDS_IN_FLIGHT`] is.
pub const MAX_SEND_BYTES_IN_FLIGHT: usize = 4 << 20;
// Any single message fits, whatever the operator's size limits: a lone send is never held back for good.
const _: () = assert!(MAX_SEND_BYTES_IN_FLIGHT >= SizeLimits::CEILING.message_bytes);
/// Most sessions one peer may have attached at once, on all super peers together (a phone, a laptop, a listener
/// and a one-off command with one key). A further attach ends the peer's oldest session with
/// `SessionEndReason::SUPERSEDED`. Sessions attached `without_presence` are not counted: they are not listed.
/// Part of the replicated state's rules, so the same on every node.
pub const MAX_SESSIONS_PER_PEER: usize = 8;
/// Most messages in one batch: a `SendBatch` from a leaf, a `MessageBatch` to a leaf, or a `DeliverCall` between
/// super peers. Batches form only when several sends are queued at once; a lone send travels alone.
pub const MAX_BATCH_MESSAGES: usize = 64;
/// Largest encoded batch, in bytes. Below the room every Leaf port leaves for framing
/// ([`SizeLimits::largest_request`]), so a batch fits whatever the operator's size limits are; a single message
/// larger than this travels alone.
pub const MAX_BATCH_BYTES: usize = 128 << 10;

/// The sizes an operator may set on a super peer (`--max-value-bytes`, `--max-attributes`,
/// `--max-attribute-value-bytes`, `--max-message-bytes`, or a `[limits]` table in the config file), each from 1
/// up to its protocol ceiling ([`SizeLimits::CEILING`]). The super peer checks requests against its own values;
/// the leaf library checks against the ceilings, which no super peer exceeds, so it fails early without knowing
/// the server's settings. Give every super peer of a cluster the same values: a peer's requests are checked by
/// whichever super peer it is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SizeLimits {
    /// Largest record value, in bytes. Default 64 KiB.
    pub value_bytes: usize,
    /// Most attributes on one record or presence profile. Default 32.
    pub attributes: usize,
    /// Longest attribute value, in bytes. Default 256.
    pub attribute_value_bytes: usize,
    /// Largest message payload, in bytes (1:1 messages and mailbox entries). Default 64 KiB.
    pub message_bytes: usize,
}

impl SizeLimits {
    /// What a super peer enforces unless its operator says otherwise.
    pub const DEFAULT: SizeLimits = SizeLimits {
        value_bytes: 64 << 10,
        attributes: 32,
        attribute_value_bytes: 256,
        message_bytes: 64 << 10,
    };

    /// The most any super peer may be set to: what the protocol carries in one Raft entry and one gRPC
    /// message without strain.
    pub const CEILING: SizeLimits = SizeLimits {
        value_bytes: 1 << 20,
        attributes: 256,
        attribute_value_bytes: 4 << 10,
        message_bytes: 1 << 20,
    };

    /// Every value that is 0 or above its ceiling, named.
    pub fn problems(&self) -> Vec<String> {
        let ceiling = Self::CEILING;
        [
            ("value_bytes", self.value_bytes, ceiling.value_bytes),
            ("attributes", self.attributes, ceiling.attributes),
            (
                "attribute_value_bytes",
                self.attribute_value_bytes,
                ceiling.attribute_value_bytes,
            ),
            ("message_bytes", self.message_bytes, ceiling.message_bytes),
        ]
        .into_iter()
        .filter(|&(_, value, max)| value == 0 || value > max)
        .map(|(name, value, max)| format!("limits.{name} is {value}; it must be 1 to {max}"))
        .collect()
    }

    /// The largest request a leaf may need to send under these limits (a record at the limits with its key and
    /// namespace, or a message), with room for the other fields and framing: the Leaf port refuses longer
    /// gRPC messages from their length prefix, before reading them.
    pub fn largest_request(&self) -> usize {
        let attributes =
            self.attributes * (MAX_ATTRIBUTE_NAME_LEN + self.attribute_value_bytes + 8);
        let record = self.value_bytes + attributes + MAX_KEY_LEN + MAX_NAMESPACE_LEN;
        record.max(self.message_bytes) + REQUEST_FRAMING_BYTES
    }
}

impl Default for SizeLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What [`SizeLimits::largest_request`] adds for fields without a size limit of their own (ids, kinds, tokens)
/// and for bounded lists (a watch names up to 1024 peers, an invitation 256).
const REQUEST_FRAMING_BYTES: usize = 256 << 10;
// A batch fits in any Leaf port's request limit, even with every size limit set to 1.
const _: () = assert!(MAX_BATCH_BYTES + 1024 < REQUEST_FRAMING_BYTES);

/// What was wrong with a request, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} {value:?} has a character outside [a-z0-9._-] or does not start with a letter or digit")]
    BadName { field: &'static str, value: String },
    #[error("{field} contains a control character")]
    ControlCharacter { field: &'static str },
    #[error("{count} attributes, the limit is {max}")]
    TooManyAttributes { count: usize, max: usize },
    #[error("{count} search terms, the limit is {max}")]
    TooManyTerms { count: usize, max: usize },
    #[error("search needs at least one term")]
    NoTerms,
    #[error("search term on {attribute:?} has no condition (equals or prefix)")]
    NoCondition { attribute: String },
    #[error("limit {limit} is above the maximum {max}")]
    LimitTooLarge { limit: u32, max: u32 },
    #[error("{field}: {reason}")]
    BadValue { field: &'static str, reason: String },
}

impl InvalidInput {
    /// Whether this error is about a size or count limit (RESOURCE_EXHAUSTED) rather than a malformed field
    /// (INVALID_ARGUMENT).
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            InvalidInput::TooLong { .. }
                | InvalidInput::TooManyAttributes { .. }
                | InvalidInput::TooManyTerms { .. }
                | InvalidInput::LimitTooLarge { .. }
        )
    }
}

fn check_len(field: &'static str, text: &str, max: usize) -> Result<(), InvalidInput> {
    if text.is_empty() {
        return Err(InvalidInput::Empty { field });
    }
    if text.len() > max {
        return Err(InvalidInput::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

/// Names (namespaces, attribute names): `[a-z0-9][a-z0-9._-]*`, so they sort and print predictably and can never
/// contain the separator bytes the index uses.
fn check_name(field: &'static str, text: &str, max: usize) -> Result<(), InvalidInput> {
    check_len(field, text, max)?;
    let mut bytes = text.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok =
        bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(InvalidInput::BadName {
            field,
            value: text.chars().take(80).collect(),
        })
    }
}

/// Free text (keys, attribute values): UTF-8 (guaranteed by the type) without control characters; in particular
/// never NUL, which separates key parts in the index.
fn check_text(field: &'static str, text: &str) -> Result<(), InvalidInput> {
    if text.chars().any(char::is_control) {
        return Err(InvalidInput::ControlCharacter { field });
    }
    Ok(())
}

/// Checks a namespace.
pub fn namespace(namespace: &str) -> Result<(), InvalidInput> {
    check_name("namespace", namespace, MAX_NAMESPACE_LEN)
}

/// Checks a record key.
pub fn key(key: &str) -> Result<(), InvalidInput> {
    check_len("key", key, MAX_KEY_LEN)?;
    check_text("key", key)
}

/// Checks a key prefix for listing (may be empty).
pub fn key_prefix(prefix: &str) -> Result<(), InvalidInput> {
    if prefix.len() > MAX_KEY_LEN {
        return Err(InvalidInput::TooLong {
            field: "key_prefix",
            len: prefix.len(),
            max: MAX_KEY_LEN,
        });
    }
    check_text("key_prefix", prefix)
}

/// Checks an attribute name.
pub fn attribute_name(name: &str) -> Result<(), InvalidInput> {
    check_name("attribute name", name, MAX_ATTRIBUTE_NAME_LEN)
}

/// Checks an attribute value (may be empty) against `limits`.
pub fn attribute_value(limits: &SizeLimits, value: &str) -> Result<(), InvalidInput> {
    if value.len() > limits.attribute_value_bytes {
        return Err(InvalidInput::TooLong {
            field: "attribute value",
            len: value.len(),
            max: limits.attribute_value_bytes,
        });
    }
    check_text("attribute value", value)
}

/// Checks an attribute map (record attributes, presence profiles) against `limits`.
pub fn attributes(
    limits: &SizeLimits,
    attributes: &HashMap<String, String>,
) -> Result<(), InvalidInput> {
    if attributes.len() > limits.attributes {
        return Err(InvalidInput::TooManyAttributes {
            count: attributes.len(),
            max: limits.attributes,
        });
    }
    for (name, attribute) in attributes {
        attribute_name(name)?;
        attribute_value(limits, attribute)?;
    }
    Ok(())
}

/// Checks a message payload against `limits`.
pub fn message_payload(limits: &SizeLimits, payload: &[u8]) -> Result<(), InvalidInput> {
    if payload.len() > limits.message_bytes {
        return Err(InvalidInput::TooLong {
            field: "payload",
            len: payload.len(),
            max: limits.message_bytes,
        });
    }
    Ok(())
}

/// Checks a message kind (same rules as names).
pub fn kind(kind: &str) -> Result<(), InvalidInput> {
    check_name("kind", kind, MAX_NAMESPACE_LEN)
}

/// Checks everything a put carries against `limits`.
pub fn record(
    limits: &SizeLimits,
    ns: &str,
    record_key: &str,
    attributes: &HashMap<String, String>,
    value: &[u8],
) -> Result<(), InvalidInput> {
    namespace(ns)?;
    key(record_key)?;
    self::attributes(limits, attributes)?;
    if value.len() > limits.value_bytes {
        return Err(InvalidInput::TooLong {
            field: "value",
            len: value.len(),
            max: limits.value_bytes,
        });
    }
    Ok(())
}

/// Resolves a requested page size: 0 means the default.
pub fn page_limit(limit: u32) -> Result<u32, InvalidInput> {
    match limit {
        0 => Ok(DEFAULT_PAGE_LIMIT),
        limit if limit > MAX_PAGE_LIMIT => Err(InvalidInput::LimitTooLarge {
            limit,
            max: MAX_PAGE_LIMIT,
        }),
        limit => Ok(limit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert!(namespace("apps.chat-1_x").is_ok());
        assert!(namespace("").is_err());
        assert!(namespace("Apps").is_err());
        assert!(namespace("-x").is_err());
        assert!(namespace("a/b").is_err());
        assert!(namespace(&"a".repeat(65)).unwrap_err().is_limit());
    }

    #[test]
    fn keys_reject_control_characters_and_length() {
        assert!(key("users/älice 1").is_ok());
        assert!(key("a\0b").is_err());
        assert!(key("").is_err());
        assert!(key(&"k".repeat(257)).is_err());
    }

    #[test]
    fn record_limits_follow_the_configured_sizes() {
        for limits in [
            SizeLimits::DEFAULT,
            SizeLimits::CEILING,
            SizeLimits {
                value_bytes: 10,
                attributes: 2,
                attribute_value_bytes: 3,
                message_bytes: 4,
            },
        ] {
            let mut attributes = HashMap::new();
            let value = vec![0; limits.value_bytes];
            assert!(record(&limits, "ns", "k", &attributes, &value).is_ok());
            let over = vec![0; limits.value_bytes + 1];
            assert_eq!(
                record(&limits, "ns", "k", &attributes, &over),
                Err(InvalidInput::TooLong {
                    field: "value",
                    len: limits.value_bytes + 1,
                    max: limits.value_bytes
                })
            );
            attributes.insert("a".into(), "v".repeat(limits.attribute_value_bytes + 1));
            assert!(record(&limits, "ns", "k", &attributes, b"")
                .unwrap_err()
                .is_limit());
            attributes.clear();
            for i in 0..=limits.attributes {
                attributes.insert(format!("a{i}"), "v".into());
            }
            assert_eq!(
                record(&limits, "ns", "k", &attributes, b""),
                Err(InvalidInput::TooManyAttributes {
                    count: limits.attributes + 1,
                    max: limits.attributes
                })
            );
            assert!(message_payload(&limits, &vec![0; limits.message_bytes]).is_ok());
            assert!(message_payload(&limits, &vec![0; limits.message_bytes + 1])
                .unwrap_err()
                .is_limit());
        }
    }

    #[test]
    fn size_limits_stay_within_their_ceilings() {
        assert!(SizeLimits::DEFAULT.problems().is_empty());
        assert!(SizeLimits::CEILING.problems().is_empty());
        let wrong = SizeLimits {
            value_bytes: 0,
            message_bytes: SizeLimits::CEILING.message_bytes + 1,
            ..SizeLimits::DEFAULT
        };
        assert_eq!(
            wrong.problems(),
            [
                "limits.value_bytes is 0; it must be 1 to 1048576",
                "limits.message_bytes is 1048577; it must be 1 to 1048576"
            ]
        );
        // The Leaf port's request limit covers a record and a message at the ceilings, and stays far below the
        // largest answer a leaf accepts.
        let ceiling = SizeLimits::CEILING;
        assert!(ceiling.largest_request() > ceiling.value_bytes + ceiling.attributes * 4096);
        assert!(ceiling.largest_request() < MAX_ANSWER_BYTES);
    }

    #[test]
    fn page_limits() {
        assert_eq!(page_limit(0), Ok(DEFAULT_PAGE_LIMIT));
        assert_eq!(page_limit(5), Ok(5));
        assert!(page_limit(MAX_PAGE_LIMIT + 1).is_err());
    }
}
