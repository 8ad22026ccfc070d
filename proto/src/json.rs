//! JSON views of protocol messages that more than one program prints (`vesperctl --json`, a super peer's ops
//! port), written once so that the two agree field for field.

use serde_json::{json, Value};

use crate::v1::PlacementAction;

/// One entry of the placement journal.
pub fn placement_action(action: &PlacementAction) -> Value {
    json!({
        "seq": action.seq,
        "at_ms": action.at_ms,
        "leader_id": action.leader_id,
        "term": action.term,
        "action": action.action,
        "why": action.why,
        "outcome": action.outcome,
    })
}
