//! Stored records to their protobuf form.

use vesper_proto::v1::Record;
use vesper_proto::PeerId;

use crate::command::StoredRecord;

/// Text form of a stored owner key. Owners are written only from authenticated sessions, whose keys were
/// validated, so the fallback (hex) shows only if storage was tampered with.
fn owner_text(owner: &[u8; 32]) -> String {
    PeerId::from_public_key_bytes(owner)
        .map(|peer| peer.to_string())
        .unwrap_or_else(|_| data_encoding::HEXLOWER.encode(owner))
}

pub fn record(namespace: &str, key: &str, stored: StoredRecord) -> Record {
    Record {
        namespace: namespace.to_string(),
        key: key.to_string(),
        owner: owner_text(&stored.owner),
        attributes: stored.attributes.into_iter().collect(),
        value: stored.value,
        version: stored.version,
        created_at_ms: stored.created_at_ms,
        updated_at_ms: stored.updated_at_ms,
    }
}

/// A page of records and the token for the next page (the last key) when more follow.
pub fn page(
    namespace: &str,
    found: Vec<(String, StoredRecord)>,
    more: bool,
) -> (Vec<Record>, String) {
    let next = if more {
        found.last().map(|(key, _)| key.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    let records = found
        .into_iter()
        .map(|(key, stored)| record(namespace, &key, stored))
        .collect();
    (records, next)
}
