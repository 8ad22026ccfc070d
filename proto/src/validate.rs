//! Limits on what a record may hold, checked by the super peer before anything is proposed to Raft (and by the
//! leaf library before anything is sent). Every limit is a named constant, listed in `docs/LIMITS.md`.

use std::collections::HashMap;

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Longest record key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Most attributes on one record.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute name, in bytes.
pub const MAX_ATTRIBUTE_NAME_LEN: usize = 64;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 256;
/// Largest record value, in bytes (64 KiB).
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most terms in one search.
pub const MAX_SEARCH_TERMS: usize = 8;
/// Most records one list or search page returns.
pub const MAX_PAGE_LIMIT: u32 = 1000;
/// Records per page when the request says 0.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;

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

/// Checks an attribute value (may be empty).
pub fn attribute_value(value: &str) -> Result<(), InvalidInput> {
    if value.len() > MAX_ATTRIBUTE_VALUE_LEN {
        return Err(InvalidInput::TooLong {
            field: "attribute value",
            len: value.len(),
            max: MAX_ATTRIBUTE_VALUE_LEN,
        });
    }
    check_text("attribute value", value)
}

/// Checks an attribute map (record attributes, presence profiles).
pub fn attributes(attributes: &HashMap<String, String>) -> Result<(), InvalidInput> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(InvalidInput::TooManyAttributes {
            count: attributes.len(),
            max: MAX_ATTRIBUTES,
        });
    }
    for (name, attribute) in attributes {
        attribute_name(name)?;
        attribute_value(attribute)?;
    }
    Ok(())
}

/// Checks a message kind (same rules as names).
pub fn kind(kind: &str) -> Result<(), InvalidInput> {
    check_name("kind", kind, MAX_NAMESPACE_LEN)
}

/// Checks everything a put carries.
pub fn record(
    ns: &str,
    record_key: &str,
    attributes: &HashMap<String, String>,
    value: &[u8],
) -> Result<(), InvalidInput> {
    namespace(ns)?;
    key(record_key)?;
    self::attributes(attributes)?;
    if value.len() > MAX_VALUE_LEN {
        return Err(InvalidInput::TooLong {
            field: "value",
            len: value.len(),
            max: MAX_VALUE_LEN,
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
    fn record_limits() {
        let mut attributes = HashMap::new();
        assert!(record("ns", "k", &attributes, &[0; MAX_VALUE_LEN]).is_ok());
        assert!(record("ns", "k", &attributes, &[0; MAX_VALUE_LEN + 1])
            .unwrap_err()
            .is_limit());
        for i in 0..=MAX_ATTRIBUTES {
            attributes.insert(format!("a{i}"), "v".into());
        }
        assert_eq!(
            record("ns", "k", &attributes, b""),
            Err(InvalidInput::TooManyAttributes {
                count: MAX_ATTRIBUTES + 1,
                max: MAX_ATTRIBUTES
            })
        );
    }

    #[test]
    fn page_limits() {
        assert_eq!(page_limit(0), Ok(DEFAULT_PAGE_LIMIT));
        assert_eq!(page_limit(5), Ok(5));
        assert!(page_limit(MAX_PAGE_LIMIT + 1).is_err());
    }
}
